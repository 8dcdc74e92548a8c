"""The Tinker-compatible training host: a training client's model, adapter and optimizer kept resident in a
worker child, running the calls the API queues for it (forward, forward_backward, optim_step, save, load)."""
