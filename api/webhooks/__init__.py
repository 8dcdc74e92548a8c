"""Webhooks: the `fine_tuning.job.*` events the API sends to configured receivers when a job ends."""
