"""One training step of the MLP head written out: forward, loss gradient and backward into buffers
allocated once per fit.

Why not autograd: at the fast profile's batch of 4096 the step's matmuls run near the machine's
matmul peak, and what autograd adds around them is elementwise work on *fresh* batch-sized
tensors every step (ReLU and its backward, addmm's bias copy, the standardised input): 8 MB each,
which the allocator maps anew and the kernels then page-fault in. In a profile of one fast fp32
epoch those took 3-4 ms each against under 1 ms on memory already touched, 14 % of the epoch.
Here every batch-sized tensor is a slice of a buffer made once, ReLU runs in place and its
backward writes over the incoming gradient.

The arithmetic is autograd's under ``torch.autocast``: the same matmuls in the same precision
(bf16 inputs, weights and outputs when ``bf16``; weight and bias gradients rounded to bf16, then
kept in the fp32 ``.grad``), the loss and its gradient from the head's own loss function.
``tests/classify/test_mlp_step.py`` checks the gradients against autograd's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLPStep:
    """Buffers and the step of one fit of a ``Linear (ReLU Linear)*`` network.

    Parameters
    ----------
    model : nn.Sequential
        Linear layers with a ReLU between each pair (:meth:`MLPHead.build_network`).
    batch_size : int
        Most rows of one step.
    bf16 : bool
        Run the matmuls in bfloat16, as ``torch.autocast("cpu", dtype=torch.bfloat16)`` would.
    affine : (scale, shift) or None
        Input standardisation ``x * scale + shift`` (1-d tensors of the input width), or None.
    loss : callable
        ``loss(logits_fp32, targets) -> scalar``; its gradient is taken by autograd (a batch of
        one or two numbers per cell: no buffer worth keeping).
    """

    def __init__(self, model: nn.Sequential, batch_size: int, *, bf16: bool,
                 affine: tuple[torch.Tensor, torch.Tensor] | None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.linears = _linears(model)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.affine = affine
        self.loss = loss
        dim = self.linears[0].in_features
        self._gathered = torch.empty(batch_size, dim)
        # fp32: standardised in place over the gathered rows; bf16: written once, rounded, into its own buffer
        self._inputs = self._gathered if not bf16 else torch.empty(batch_size, dim, dtype=self.dtype)
        widths = [lin.out_features for lin in self.linears[:-1]]
        self._hidden = [torch.empty(batch_size, w, dtype=self.dtype) for w in widths]
        self._grad_hidden = [torch.empty(batch_size, w, dtype=self.dtype) for w in widths]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # written in full by every step: no zero_grad between steps

    def __call__(self, X: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Gradients of the loss on ``X[rows]`` into every parameter's ``.grad``; returns the loss (detached)."""
        n = int(rows.numel())
        with torch.no_grad():
            x = self._input_rows(X, rows, n)
            weights = [lin.weight.to(self.dtype) for lin in self.linears]  # the same tensor for fp32
            biases = [lin.bias.to(self.dtype) for lin in self.linears]
            activations = self._forward(x, weights, biases, n)
            logits = torch.addmm(biases[-1], activations[-1], weights[-1].t())
        loss, grad_logits = self._loss_and_gradient(logits, targets.index_select(0, rows))
        with torch.no_grad():
            self._backward(grad_logits.to(self.dtype), [x, *activations], weights, n)
        return loss

    def _input_rows(self, X: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        gathered = torch.index_select(X, 0, rows, out=self._gathered[:n])
        if self.affine is not None:
            torch.addcmul(self.affine[1], gathered, self.affine[0], out=gathered)
        inputs = self._inputs[:n]
        if inputs.data_ptr() != gathered.data_ptr():
            # in place, then rounded: writing addcmul's result straight into bf16 took a slow mixed-dtype
            # path (25.8 ms against 1.8 + 1.9 ms for 4096 x 3072 rows on one core)
            inputs.copy_(gathered)
        return inputs

    def _forward(self, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                 n: int) -> list[torch.Tensor]:
        activations = []
        current = x
        for i, buffer in enumerate(self._hidden):
            current = torch.addmm(biases[i], current, weights[i].t(), out=buffer[:n]).clamp_(min=0)
            activations.append(current)
        return activations

    def _loss_and_gradient(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = logits.float().requires_grad_(True)
            loss = self.loss(leaf, targets)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    def _backward(self, grad: torch.Tensor, inputs: list[torch.Tensor], weights: list[torch.Tensor], n: int) -> None:
        """``inputs[i]`` is layer i's input; ``grad`` the gradient of the last layer's output."""
        for i in reversed(range(len(self.linears))):
            self._parameter_gradients(self.linears[i], grad, inputs[i])
            if i == 0:
                break  # the input needs no gradient
            upstream = torch.mm(grad, weights[i], out=self._grad_hidden[i - 1][:n])
            # ReLU's backward in place: zero where the (post-ReLU) activation is zero
            torch.ops.aten.threshold_backward.grad_input(upstream, inputs[i], 0, grad_input=upstream)
            grad = upstream

    def _parameter_gradients(self, lin: nn.Linear, grad: torch.Tensor, inputs: torch.Tensor) -> None:
        assert lin.weight.grad is not None and lin.bias.grad is not None
        if self.dtype == torch.float32:
            torch.mm(grad.t(), inputs, out=lin.weight.grad)
            torch.sum(grad, 0, out=lin.bias.grad)
        else:  # rounded to bf16 by the matmul, as under autocast, then kept in fp32
            lin.weight.grad.copy_(torch.mm(grad.t(), inputs))
            lin.bias.grad.copy_(grad.sum(0))


def _linears(model: nn.Sequential) -> list[nn.Linear]:
    layers = list(model)
    linears = [m for m in layers[0::2] if isinstance(m, nn.Linear)]
    relus = [m for m in layers[1::2] if isinstance(m, nn.ReLU)]
    if not linears or len(layers) % 2 == 0 or len(linears) + len(relus) != len(layers):
        raise TypeError(f"MLPStep expects Linear (ReLU Linear)* layers, got {model}")
    return linears
