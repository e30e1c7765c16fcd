"""Plain attention in float64: the yardstick the routed attention is compared with."""
import math

import torch


def attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v over k's tokens only; [B, N, H*d] in and out."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(k.shape[0], -1, heads, d).transpose(1, 2)
    vh = v.double().view(v.shape[0], -1, heads, d).transpose(1, 2)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1)
    return (p @ vh).transpose(1, 2).reshape(b, n, c)
