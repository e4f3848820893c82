"""Every layer of the CNN with its forward AND backward pass written by hand (README, equations 1-14).

Each layer is a pair of plain functions, `<layer>_forward(...) -> (output, cache)` and
`<layer>_backward(output_gradient, cache) -> input/parameter gradients`, so that the no-autograd training
step in model.py can chain them itself. Each pair is also wrapped in a `torch.autograd.Function`, so that
ordinary `loss.backward()` training runs exactly the same formulas.

Shapes: N batch, C input channels, O output channels, H x W input size, P x Q output size, K kernel size.
"""

import torch

# ----------------------------------------------------------------------------------------------------------
# im2col: the windows of an image laid out as the columns of a matrix (README, "im2col")


def window_slice(images, row, col, out_height, out_width, stride):
    """Element (row, col) of every window at once: the strided view images[:, :, row + y*stride, col + x*stride]."""
    return images[
        :, :, row : row + (out_height - 1) * stride + 1 : stride, col : col + (out_width - 1) * stride + 1 : stride
    ]


def output_size(size, kernel_size, stride):
    """How many windows of `kernel_size` fit, `stride` apart, into `size` pixels: floor((size - K) / s) + 1."""
    return (size - kernel_size) // stride + 1


def im2col(images, kernel_size, stride):
    """Copy every K x K window into one column: (N, C, H, W) -> (N, C*K*K, P*Q)."""
    batch, channels, height, width = images.shape
    out_height, out_width = output_size(height, kernel_size, stride), output_size(width, kernel_size, stride)
    columns = images.new_empty(batch, channels, kernel_size, kernel_size, out_height, out_width)
    for row in range(kernel_size):
        for col in range(kernel_size):
            columns[:, :, row, col] = window_slice(images, row, col, out_height, out_width, stride)  # (N, C, P, Q)
    return columns.view(batch, channels * kernel_size * kernel_size, out_height * out_width)


def correlate(images, weight, stride):
    """Cross-correlation, no padding, as one matrix product: (N, C, H, W) * (O, C, K, K) -> (N, O, P, Q)."""
    out_channels, _, kernel_size, _ = weight.shape
    batch, _, height, width = images.shape
    columns = im2col(images, kernel_size, stride)  # (N, C*K*K, P*Q)
    weight_matrix = weight.reshape(out_channels, -1).expand(batch, -1, -1)  # (N, O, C*K*K), no copy
    output = torch.bmm(weight_matrix, columns)  # (N, O, C*K*K) @ (N, C*K*K, P*Q) -> (N, O, P*Q)
    out_height, out_width = output_size(height, kernel_size, stride), output_size(width, kernel_size, stride)
    return output.view(batch, out_channels, out_height, out_width), columns


def pad(images, padding):
    """Zero-pad the two spatial dimensions of (N, C, H, W) by `padding` on each side."""
    if padding == 0:
        return images
    batch, channels, height, width = images.shape
    padded = images.new_zeros(batch, channels, height + 2 * padding, width + 2 * padding)
    padded[:, :, padding : padding + height, padding : padding + width] = images
    return padded


# ----------------------------------------------------------------------------------------------------------
# Convolution (equations 8-11)


def conv2d_forward(images, weight, bias, stride=1, padding=0):
    """z = a * W + b (eq. 8): pad, then correlate every window with every kernel, add the bias."""
    padded = pad(images, padding)  # (N, C, H+2p, W+2p)
    output, columns = correlate(padded, weight, stride)  # (N, O, P, Q), (N, C*K*K, P*Q)
    output += bias.view(1, -1, 1, 1)  # (N, O, P, Q)
    cache = (columns, weight, images.shape, stride, padding)
    return output, cache


def conv2d_backward(output_gradient, cache, need_input_gradient=True, input_gradient_method="col2im"):
    """dJ/da, dJ/dW, dJ/db of a convolution (eqs. 9-11) from delta = dJ/dz of shape (N, O, P, Q)."""
    columns, weight, input_shape, stride, padding = cache
    batch, out_channels, out_height, out_width = output_gradient.shape
    delta = output_gradient.reshape(batch, out_channels, out_height * out_width)  # (N, O, P*Q)
    # eq. 10: dJ/dW = a * delta, a correlation of the input with delta; with im2col, a matrix product
    # per image, (O, P*Q) @ (P*Q, C*K*K), summed over the batch
    weight_gradient = torch.bmm(delta, columns.transpose(1, 2)).sum(dim=0).view(weight.shape)  # (O, C, K, K)
    # eq. 11: dJ/db = the sum of delta over the batch and every position
    bias_gradient = delta.sum(dim=(0, 2))  # (O,)
    if not need_input_gradient:
        return None, weight_gradient, bias_gradient
    if input_gradient_method == "rot180":
        input_gradient = conv2d_input_gradient_rot180(output_gradient, weight, input_shape, stride, padding)
    else:
        input_gradient = conv2d_input_gradient_col2im(delta, weight, input_shape, stride, padding)
    return input_gradient, weight_gradient, bias_gradient


def conv2d_input_gradient_rot180(output_gradient, weight, input_shape, stride, padding):
    """Eq. 9 as written: dJ/da = delta (spread by the stride, zero-padded by K-1) correlated with rot180(W)."""
    batch, out_channels, out_height, out_width = output_gradient.shape
    kernel_size = weight.shape[2]
    height, width = input_shape[2] + 2 * padding, input_shape[3] + 2 * padding
    # put delta[y, x] at row K-1 + y*stride, column K-1 + x*stride of a zero grid (the "full" padding)
    spread = output_gradient.new_zeros(batch, out_channels, height + kernel_size - 1, width + kernel_size - 1)
    last_row = kernel_size - 1 + (out_height - 1) * stride + 1
    last_col = kernel_size - 1 + (out_width - 1) * stride + 1
    spread[:, :, kernel_size - 1 : last_row : stride, kernel_size - 1 : last_col : stride] = output_gradient
    rotated = weight.flip(2, 3).transpose(0, 1)  # rot180 of every kernel, in and out channels swapped: (C, O, K, K)
    padded_input_gradient, _ = correlate(spread, rotated, 1)  # (N, C, H+2p, W+2p)
    return padded_input_gradient[:, :, padding : height - padding, padding : width - padding]


def conv2d_input_gradient_col2im(delta, weight, input_shape, stride, padding):
    """Eq. 9 summed in im2col order: column gradients W^T delta, each added back where its window came from."""
    out_channels, in_channels, kernel_size, _ = weight.shape
    batch, height, width = input_shape[0], input_shape[2] + 2 * padding, input_shape[3] + 2 * padding
    out_height, out_width = output_size(height, kernel_size, stride), output_size(width, kernel_size, stride)
    transposed_weight = weight.reshape(out_channels, -1).T.expand(batch, -1, -1)  # (N, C*K*K, O), no copy
    column_gradient = torch.bmm(transposed_weight, delta)  # (N, C*K*K, O) @ (N, O, P*Q) -> (N, C*K*K, P*Q)
    column_gradient = column_gradient.view(batch, in_channels, kernel_size, kernel_size, out_height, out_width)
    padded_input_gradient = add_windows(column_gradient, (batch, in_channels, height, width), stride)
    return padded_input_gradient[:, :, padding : height - padding, padding : width - padding]


class Conv2dFunction(torch.autograd.Function):
    """2-D convolution whose backward is conv2d_backward (eqs. 9-11)."""

    @staticmethod
    def forward(context, images, weight, bias, stride, padding, input_gradient_method="col2im"):
        output, (columns, weight, input_shape, stride, padding) = conv2d_forward(images, weight, bias, stride, padding)
        context.save_for_backward(columns, weight)  # tensors through autograd's own store; sizes as attributes
        context.input_shape, context.stride, context.padding = input_shape, stride, padding
        context.input_gradient_method = input_gradient_method
        return output

    @staticmethod
    def backward(context, output_gradient):
        need_input_gradient = context.needs_input_grad[0]
        columns, weight = context.saved_tensors
        cache = (columns, weight, context.input_shape, context.stride, context.padding)
        input_gradient, weight_gradient, bias_gradient = conv2d_backward(
            output_gradient, cache, need_input_gradient, context.input_gradient_method
        )
        return input_gradient, weight_gradient, bias_gradient, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Pooling (equations 6-7): the backward pass "upsamples" delta back onto the input grid


def add_windows(window_values, input_shape, stride):
    """col2im: add window values (N, C, K, K, P, Q) back onto a zero (N, C, H, W) grid where each came from."""
    grid = window_values.new_zeros(input_shape)  # (N, C, H, W)
    _, _, kernel_size, _, out_height, out_width = window_values.shape
    for row in range(kernel_size):
        for col in range(kernel_size):
            # window (y, x) took its element (row, col) from grid position (y*stride + row, x*stride + col)
            window_slice(grid, row, col, out_height, out_width, stride).add_(window_values[:, :, row, col])
    return grid


def window_elements(images, kernel_size, stride):
    """The K*K strided views that pooling visits, e = 0 .. K*K-1: element (e // K, e % K) of every K x K window at
    once, each (N, C, P, Q). They are views, so adding into one adds into `images`."""
    height, width = images.shape[2:]
    out_height, out_width = output_size(height, kernel_size, stride), output_size(width, kernel_size, stride)
    for element in range(kernel_size * kernel_size):
        yield window_slice(images, element // kernel_size, element % kernel_size, out_height, out_width, stride)


def max_pool2d_forward(images, kernel_size, stride=None):
    """The largest value of every K x K window (eq. 6), and which of the K*K elements it was."""
    stride = stride or kernel_size
    elements = window_elements(images, kernel_size, stride)
    output = next(elements).clone()  # (N, C, P, Q): element 0 of every window, the first candidate
    winner = torch.zeros(output.shape, dtype=torch.uint8, device=images.device)  # (N, C, P, Q)
    for element, candidate in enumerate(elements, start=1):  # one pass per window element: K*K cheap passes
        larger = candidate > output  # strictly larger: on a tie the first element keeps the max, as in torch
        output = torch.where(larger, candidate, output)
        winner.masked_fill_(larger, element)
    return output, (winner, images.shape, kernel_size, stride)


def max_pool2d_backward(output_gradient, cache):
    """Eq. 7 (max): each window's delta goes to the element that won the max, zero to the others."""
    winner, input_shape, kernel_size, stride = cache
    input_gradient = output_gradient.new_zeros(input_shape)  # (N, C, H, W)
    for element, target in enumerate(window_elements(input_gradient, kernel_size, stride)):
        target.add_(output_gradient * (winner == element))  # (N, C, P, Q)
    return input_gradient


def avg_pool2d_forward(images, kernel_size, stride=None):
    """The mean of every K x K window (eq. 6)."""
    stride = stride or kernel_size
    elements = window_elements(images, kernel_size, stride)
    total = next(elements).clone()  # (N, C, P, Q)
    for element in elements:
        total += element
    return total / (kernel_size * kernel_size), (images.shape, kernel_size, stride)


def avg_pool2d_backward(output_gradient, cache):
    """Eq. 7 (average): each window's delta is shared equally, delta / K^2, by its K^2 inputs."""
    input_shape, kernel_size, stride = cache
    share = output_gradient / (kernel_size * kernel_size)  # (N, C, P, Q)
    input_gradient = output_gradient.new_zeros(input_shape)  # (N, C, H, W)
    for target in window_elements(input_gradient, kernel_size, stride):
        target.add_(share)
    return input_gradient


class MaxPool2dFunction(torch.autograd.Function):
    """Max pooling whose backward routes delta to each window's maximum (eq. 7)."""

    @staticmethod
    def forward(context, images, kernel_size, stride):
        output, (winner, input_shape, kernel_size, stride) = max_pool2d_forward(images, kernel_size, stride)
        context.save_for_backward(winner)
        context.input_shape, context.kernel_size, context.stride = input_shape, kernel_size, stride
        return output

    @staticmethod
    def backward(context, output_gradient):
        (winner,) = context.saved_tensors
        cache = (winner, context.input_shape, context.kernel_size, context.stride)
        return max_pool2d_backward(output_gradient, cache), None, None


class AvgPool2dFunction(torch.autograd.Function):
    """Average pooling whose backward spreads delta evenly over each window (eq. 7)."""

    @staticmethod
    def forward(context, images, kernel_size, stride):
        output, (input_shape, kernel_size, stride) = avg_pool2d_forward(images, kernel_size, stride)
        context.input_shape, context.kernel_size, context.stride = input_shape, kernel_size, stride  # no tensors
        return output

    @staticmethod
    def backward(context, output_gradient):
        cache = (context.input_shape, context.kernel_size, context.stride)
        return avg_pool2d_backward(output_gradient, cache), None, None


# ----------------------------------------------------------------------------------------------------------
# ReLU, dropout, fully connected, softmax cross-entropy (equations 1-5)


def relu_forward(pre_activation):
    """a = max(z, 0) (eq. 2)."""
    return pre_activation.clamp(min=0), pre_activation > 0


def relu_backward(output_gradient, positive):
    """delta_z = delta_a * relu'(z), where relu'(z) = 1 if z > 0 else 0 (eq. 4)."""
    return output_gradient * positive


def dropout_forward(activations, drop_probability, generator=None):
    """Zero each activation with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    keep = torch.rand(activations.shape, device=activations.device, generator=generator) >= drop_probability
    scale = keep.to(activations.dtype) / (1.0 - drop_probability)  # same shape as activations
    return activations * scale, scale


def dropout_backward(output_gradient, scale):
    """Dropout is a fixed elementwise product, so delta is multiplied by the same mask."""
    return output_gradient * scale


def linear_forward(inputs, weight, bias):
    """z = a W^T + b (eq. 1), with a of shape (N, D_in) and W of shape (D_out, D_in)."""
    return inputs @ weight.T + bias, (inputs, weight)


def linear_backward(output_gradient, cache):
    """dJ/da = delta W, dJ/dW = delta^T a, dJ/db = sum of delta over the batch (eqs. 4-5)."""
    inputs, weight = cache
    return output_gradient @ weight, output_gradient.T @ inputs, output_gradient.sum(dim=0)


def cross_entropy_forward(logits, labels):
    """J = mean over the batch of -log softmax(z)[y] (eq. 3), computed stably with log-sum-exp."""
    shifted = logits - logits.max(dim=1, keepdim=True).values  # (N, 10)
    log_probabilities = shifted - shifted.exp().sum(dim=1, keepdim=True).log()  # (N, 10)
    loss = -log_probabilities.gather(1, labels.unsqueeze(1)).mean()
    return loss, (log_probabilities, labels)


def cross_entropy_backward(cache):
    """delta^L = dJ/dz = (softmax(z) - onehot(y)) / N (eq. 3)."""
    log_probabilities, labels = cache
    delta = log_probabilities.exp()  # (N, 10)
    delta[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    return delta / labels.shape[0]


class ReLUFunction(torch.autograd.Function):
    """ReLU whose backward multiplies delta by relu'(z)."""

    @staticmethod
    def forward(context, pre_activation):
        output, positive = relu_forward(pre_activation)
        context.save_for_backward(positive)
        return output

    @staticmethod
    def backward(context, output_gradient):
        (positive,) = context.saved_tensors
        return relu_backward(output_gradient, positive)


class DropoutFunction(torch.autograd.Function):
    """Inverted dropout whose backward multiplies delta by the same mask."""

    @staticmethod
    def forward(context, activations, drop_probability, generator):
        output, scale = dropout_forward(activations, drop_probability, generator)
        context.save_for_backward(scale)
        return output

    @staticmethod
    def backward(context, output_gradient):
        (scale,) = context.saved_tensors
        return dropout_backward(output_gradient, scale), None, None


class LinearFunction(torch.autograd.Function):
    """Fully connected layer whose backward is linear_backward (eqs. 4-5)."""

    @staticmethod
    def forward(context, inputs, weight, bias):
        output, (inputs, weight) = linear_forward(inputs, weight, bias)
        context.save_for_backward(inputs, weight)
        return output

    @staticmethod
    def backward(context, output_gradient):
        return linear_backward(output_gradient, context.saved_tensors)


class CrossEntropyFunction(torch.autograd.Function):
    """Softmax cross-entropy whose backward is (softmax - onehot) / N (eq. 3)."""

    @staticmethod
    def forward(context, logits, labels):
        loss, (log_probabilities, labels) = cross_entropy_forward(logits, labels)
        context.save_for_backward(log_probabilities, labels)
        return loss

    @staticmethod
    def backward(context, loss_gradient):
        return loss_gradient * cross_entropy_backward(context.saved_tensors), None
