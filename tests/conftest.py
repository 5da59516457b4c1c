"""Test-wide settings."""
import torch

# The tests use tiny tensors and models: one thread avoids oversubscribing CI's two cores, where
# thread hand-off costs more than the arithmetic.
torch.set_num_threads(1)
