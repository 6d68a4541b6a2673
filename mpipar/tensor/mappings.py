"""Megatron's conjugate operators as autograd functions, so backward communicates exactly what
forward's split implies and nothing more.

    f = copy_to_tp       forward: identity          backward: all-reduce
    g = reduce_from_tp   forward: all-reduce        backward: identity
    gather_from_tp       forward: all-gather (last) backward: keep own slice
    scatter_to_tp        forward: keep own slice    backward: all-gather (last)
"""
from __future__ import annotations

import torch


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad, "backward"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return group.all_reduce(x, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather_last(x, "forward")

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.local_slice_last(grad), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.local_slice_last(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather_last(grad, "backward"), None


def copy_to_tp(x, group):
    return x if group.size == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group.size == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group):
    return x if group.size == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return x if group.size == 1 else _ScatterToTP.apply(x, group)
