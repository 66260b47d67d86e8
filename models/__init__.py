"""Model definitions (RLSD, Order-Free RNN, ...) arrive with their issues."""
