"""The rnnlm model (full softmax) in PyTorch, written the usual way: the baseline both speed benchmarks run.

nn.Embedding(V, m) holds W_xᵀ (the lookup is W_x times the one-hot input), nn.RNN(m, m, tanh) the
recurrence (its W_ih starts as the identity, its two biases sum to b_s), nn.Linear(m, V) the output
layer; mean F.cross_entropy, clip_grad_norm_, torch.optim.SGD; the state is carried with .detach(). On a GPU,
in float32 with TF32 off (rnnlm has no tensor-core path).
It starts from rnnlm's parameters, so its first losses equal rnnlm's. PyTorch is imported on use: it is
an optional dependency of the benchmarks only.
"""

import numpy as np


class TorchRNN:
    """params: rnnlm's float32 parameters (W_x, W_s, b_s, W_o, b_o); windows: (inputs, targets) pairs,
    each (T, B) integer arrays; device: "cpu" or "cuda"."""

    def __init__(self, params, windows, batch, lr, clip, device="cpu"):
        import torch
        from torch import nn
        from torch.nn import functional

        self.torch, self.F, self.nn, self.clip, self.device = torch, functional, nn, clip, device
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        m, V = params["W_s"].shape[0], params["W_o"].shape[0]
        self.m = m
        self.emb, self.rnn, self.out = nn.Embedding(V, m), nn.RNN(m, m, nonlinearity="tanh"), nn.Linear(m, V)
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(np.ascontiguousarray(params["W_x"].T)))
            self.rnn.weight_ih_l0.copy_(torch.eye(m))
            self.rnn.bias_ih_l0.zero_()
            self.rnn.weight_hh_l0.copy_(torch.from_numpy(params["W_s"]))
            self.rnn.bias_hh_l0.copy_(torch.from_numpy(params["b_s"]))
            self.out.weight.copy_(torch.from_numpy(params["W_o"]))
            self.out.bias.copy_(torch.from_numpy(params["b_o"]))
        for module in (self.emb, self.rnn, self.out):
            module.to(device)
        self.parameters = [*self.emb.parameters(), *self.rnn.parameters(), *self.out.parameters()]
        self.opt = torch.optim.SGD(self.parameters, lr=lr)
        self.h = torch.zeros(1, batch, m, device=device)
        self.data = [
            (torch.from_numpy(np.asarray(x, np.int64)).to(device),
             torch.from_numpy(np.asarray(y, np.int64).reshape(-1)).to(device))
            for x, y in windows
        ]

    def train(self, k):
        """One SGD step on window k; returns its summed loss (a host float, as rnnlm's step does)."""
        x, y = self.data[k]
        self.opt.zero_grad()
        states, h = self.rnn(self.emb(x), self.h)
        loss = self.F.cross_entropy(self.out(states.reshape(-1, self.m)), y)
        loss.backward()
        self.nn.utils.clip_grad_norm_(self.parameters, self.clip)
        self.opt.step()
        self.h = h.detach()
        return loss.item() * y.shape[0]

    def eval(self, k):
        """Summed loss of window k without gradients."""
        x, y = self.data[k]
        with self.torch.no_grad():
            states, self.h = self.rnn(self.emb(x), self.h)
            loss = self.F.cross_entropy(self.out(states.reshape(-1, self.m)), y, reduction="sum")
        return loss.item()

    def sync(self):
        """Wait for the device (nothing to wait for on the CPU)."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()
