"""The CNN, twice: from the hand-written layers of layers.py, and from torch.nn; plus a step with no autograd.

    image (N, 1, 28, 28)
    -> conv 5x5, 32 channels, padding 2 -> ReLU -> max-pool 2   (N, 32, 14, 14)
    -> conv 3x3, 64 channels, padding 1 -> ReLU -> max-pool 2   (N, 64, 7, 7)
    -> flatten -> fully connected 3136 -> 128 -> ReLU -> dropout  (N, 128)
    -> fully connected 128 -> 10 -> softmax cross-entropy        (N, 10)
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cnn import layers


@dataclass
class CNNConfig:
    """Everything that fixes the shape of the network."""

    conv1_channels: int = 32
    conv1_kernel: int = 5
    conv2_channels: int = 64
    conv2_kernel: int = 3
    hidden_size: int = 128
    dropout: float = 0.5
    pooling: str = "max"  # "max" or "avg"

    def flat_size(self):
        """Length of the flattened feature map after two conv blocks, each halving 28 -> 14 -> 7."""
        return self.conv2_channels * 7 * 7

    def to_dict(self):
        """The config as a plain dict (for checkpoints)."""
        return asdict(self)


class HandwrittenConv2d(nn.Module):
    """A convolution layer whose forward and backward are layers.Conv2dFunction."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, input_gradient_method="col2im"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.stride, self.padding, self.input_gradient_method = stride, padding, input_gradient_method

    def forward(self, images):
        return layers.Conv2dFunction.apply(
            images, self.weight, self.bias, self.stride, self.padding, self.input_gradient_method
        )


class HandwrittenLinear(nn.Module):
    """A fully connected layer whose forward and backward are layers.LinearFunction."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, inputs):
        return layers.LinearFunction.apply(inputs, self.weight, self.bias)


def initialise(model, seed):
    """He initialisation, W ~ N(0, 2 / fan_in), biases 0: the same numbers for both implementations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight"):
                fan_in = parameter[0].numel()
                values = torch.randn(parameter.shape, generator=generator) * math.sqrt(2.0 / fan_in)
                parameter.copy_(values)
            else:
                parameter.zero_()
    return model


class HandwrittenCNN(nn.Module):
    """The network of this chapter, every layer's backward written by hand (layers.py)."""

    def __init__(self, config, input_gradient_method="col2im"):
        super().__init__()
        self.config = config
        self.conv1 = HandwrittenConv2d(1, config.conv1_channels, config.conv1_kernel, padding=config.conv1_kernel // 2)
        self.conv2 = HandwrittenConv2d(
            config.conv1_channels,
            config.conv2_channels,
            config.conv2_kernel,
            padding=config.conv2_kernel // 2,
            input_gradient_method=input_gradient_method,
        )
        self.fc1 = HandwrittenLinear(config.flat_size(), config.hidden_size)
        self.fc2 = HandwrittenLinear(config.hidden_size, 10)
        self.pool = layers.MaxPool2dFunction if config.pooling == "max" else layers.AvgPool2dFunction

    def features(self, images):
        """The feature maps of both conv blocks: (N, 32, 14, 14) and (N, 64, 7, 7)."""
        block1 = self.pool.apply(layers.ReLUFunction.apply(self.conv1(images)), 2, 2)  # (N, 32, 14, 14)
        block2 = self.pool.apply(layers.ReLUFunction.apply(self.conv2(block1)), 2, 2)  # (N, 64, 7, 7)
        return block1, block2

    def forward(self, images):
        """Logits (N, 10) of images (N, 1, 28, 28)."""
        _, block2 = self.features(images)
        flat = block2.reshape(block2.shape[0], -1)  # (N, 3136)
        hidden = layers.ReLUFunction.apply(self.fc1(flat))  # (N, 128)
        if self.training and self.config.dropout > 0:
            hidden = layers.DropoutFunction.apply(hidden, self.config.dropout, None)
        return self.fc2(hidden)  # (N, 10)

    def loss(self, logits, labels):
        """Mean softmax cross-entropy (eq. 3)."""
        return layers.CrossEntropyFunction.apply(logits, labels)


class TorchCNN(nn.Module):
    """The same network from torch.nn, with the same parameter names, for comparison."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(1, config.conv1_channels, config.conv1_kernel, padding=config.conv1_kernel // 2)
        self.conv2 = nn.Conv2d(
            config.conv1_channels, config.conv2_channels, config.conv2_kernel, padding=config.conv2_kernel // 2
        )
        self.fc1 = nn.Linear(config.flat_size(), config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, 10)
        self.pool = nn.MaxPool2d(2) if config.pooling == "max" else nn.AvgPool2d(2)
        self.dropout = nn.Dropout(config.dropout)

    def features(self, images):
        """The feature maps of both conv blocks: (N, 32, 14, 14) and (N, 64, 7, 7)."""
        block1 = self.pool(torch.relu(self.conv1(images)))  # (N, 32, 14, 14)
        block2 = self.pool(torch.relu(self.conv2(block1)))  # (N, 64, 7, 7)
        return block1, block2

    def forward(self, images):
        """Logits (N, 10) of images (N, 1, 28, 28)."""
        _, block2 = self.features(images)
        hidden = self.dropout(torch.relu(self.fc1(block2.flatten(1))))  # (N, 128)
        return self.fc2(hidden)  # (N, 10)

    def loss(self, logits, labels):
        """Mean softmax cross-entropy."""
        return nn.functional.cross_entropy(logits, labels)


def build_model(config, implementation="handwritten", seed=0, input_gradient_method="col2im"):
    """The network of `config` in the chosen implementation, initialised from `seed`."""
    if implementation == "handwritten":
        model = HandwrittenCNN(config, input_gradient_method)
    elif implementation == "torch":
        model = TorchCNN(config)
    else:
        raise ValueError(f"unknown implementation {implementation!r} (choose handwritten or torch)")
    return initialise(model, seed)


# ----------------------------------------------------------------------------------------------------------
# No autograd at all: the forward pass keeps what each backward needs, the backward pass runs in reverse


def manual_forward_backward(model, images, labels):
    """Loss and dJ/dparameter of a HandwrittenCNN, by chaining the hand-written forwards and backwards."""
    config, pooling = model.config, model.config.pooling
    pool_forward = layers.max_pool2d_forward if pooling == "max" else layers.avg_pool2d_forward
    pool_backward = layers.max_pool2d_backward if pooling == "max" else layers.avg_pool2d_backward
    with torch.no_grad():
        # forward, layer by layer, keeping each layer's cache
        z1, conv1_cache = layers.conv2d_forward(images, model.conv1.weight, model.conv1.bias, 1, model.conv1.padding)
        a1, relu1_positive = layers.relu_forward(z1)  # (N, 32, 28, 28)
        p1, pool1_cache = pool_forward(a1, 2, 2)  # (N, 32, 14, 14)
        z2, conv2_cache = layers.conv2d_forward(p1, model.conv2.weight, model.conv2.bias, 1, model.conv2.padding)
        a2, relu2_positive = layers.relu_forward(z2)  # (N, 64, 14, 14)
        p2, pool2_cache = pool_forward(a2, 2, 2)  # (N, 64, 7, 7)
        flat = p2.reshape(p2.shape[0], -1)  # (N, 3136)
        z3, fc1_cache = layers.linear_forward(flat, model.fc1.weight, model.fc1.bias)  # (N, 128)
        a3, relu3_positive = layers.relu_forward(z3)  # (N, 128)
        dropout_scale = None
        if model.training and config.dropout > 0:
            a3, dropout_scale = layers.dropout_forward(a3, config.dropout)
        logits, fc2_cache = layers.linear_forward(a3, model.fc2.weight, model.fc2.bias)  # (N, 10)
        loss, loss_cache = layers.cross_entropy_forward(logits, labels)

        # backward, in reverse order: delta flows from the loss to the image
        gradients = {}
        delta = layers.cross_entropy_backward(loss_cache)  # dJ/dlogits, (N, 10)
        delta, gradients["fc2.weight"], gradients["fc2.bias"] = layers.linear_backward(delta, fc2_cache)
        if dropout_scale is not None:
            delta = layers.dropout_backward(delta, dropout_scale)
        delta = layers.relu_backward(delta, relu3_positive)  # dJ/dz3, (N, 128)
        delta, gradients["fc1.weight"], gradients["fc1.bias"] = layers.linear_backward(delta, fc1_cache)
        delta = delta.reshape(p2.shape)  # (N, 64, 7, 7)
        delta = layers.relu_backward(pool_backward(delta, pool2_cache), relu2_positive)  # dJ/dz2, (N, 64, 14, 14)
        delta, gradients["conv2.weight"], gradients["conv2.bias"] = layers.conv2d_backward(
            delta, conv2_cache, True, model.conv2.input_gradient_method
        )
        delta = layers.relu_backward(pool_backward(delta, pool1_cache), relu1_positive)  # dJ/dz1, (N, 32, 28, 28)
        _, gradients["conv1.weight"], gradients["conv1.bias"] = layers.conv2d_backward(delta, conv1_cache, False)
    return loss, logits, gradients


def sgd_momentum_update(parameters, gradients, velocities, learning_rate, momentum, weight_decay=0.0):
    """v <- mu v + (g + lambda w);  w <- w - lr v   (the update of torch.optim.SGD, dampening 0), in place."""
    with torch.no_grad():
        for name, parameter in parameters.items():
            gradient = gradients[name] + weight_decay * parameter
            velocities[name].mul_(momentum).add_(gradient)
            parameter.sub_(learning_rate * velocities[name])


def manual_training_step(model, images, labels, velocities, learning_rate, momentum, weight_decay=0.0,
                         return_logits=False):
    """One SGD-with-momentum step computed by hand: forward, backward, update. Returns the loss (and the logits).

    A loss that is not finite leaves the weights as they were: the caller decides what a diverged run does.
    """
    loss, logits, gradients = manual_forward_backward(model, images, labels)
    if torch.isfinite(loss):
        parameters = dict(model.named_parameters())
        sgd_momentum_update(parameters, gradients, velocities, learning_rate, momentum, weight_decay)
    return (loss, logits) if return_logits else loss
