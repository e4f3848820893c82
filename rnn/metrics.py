"""Predictions over a whole split, accuracy, macro-F1 and the confusion matrix."""

import torch


@torch.no_grad()
def predict_probabilities(model, character_ids, lengths, device, batch_size=512):
    """Class probabilities (N, C) for padded ids (N, T) and lengths (N,), in batches, on `device`."""
    model.eval()
    probabilities = []
    for start in range(0, len(lengths), batch_size):
        batch_lengths = lengths[start:start + batch_size]  # (B,)
        steps = int(batch_lengths.max())
        batch_ids = character_ids[start:start + batch_size, :steps].to(device)  # (B, T)
        logits = model(batch_ids, batch_lengths.to(device))  # (B, C)
        probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(probabilities)  # (N, C)


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted] (C, C)."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    return counts


def macro_f1(confusion):
    """The F1 score of each class, averaged with equal weight per class (classes absent everywhere count as 0)."""
    true_positives = confusion.diag().double()  # (C,)
    predicted = confusion.sum(0).double()  # (C,)
    actual = confusion.sum(1).double()  # (C,)
    f1 = 2 * true_positives / (predicted + actual).clamp(min=1)  # (C,)
    return f1.mean().item()


def classification_metrics(labels, probabilities):
    """Accuracy, macro-F1 and the confusion matrix of predicted probabilities (N, C) against labels (N,)."""
    predictions = probabilities.argmax(-1)  # (N,)
    confusion = confusion_matrix(labels, predictions, probabilities.shape[1])
    accuracy = (predictions == labels).double().mean().item()
    return {"accuracy": accuracy, "macro_f1": macro_f1(confusion), "confusion": confusion}
