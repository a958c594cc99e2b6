"""Flax NNX implementation of the Qwen2 decoder family."""

from jresid.model.transformer import Block, BlockActivations, ForwardOutput, Qwen2

__all__ = ["Block", "BlockActivations", "ForwardOutput", "Qwen2"]
