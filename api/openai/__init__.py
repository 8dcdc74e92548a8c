"""The OpenAI-compatible fine-tuning surface (`/v1/files`, `/v1/fine_tuning/jobs...`), which the official
`openai` client can drive: its schemas, stored records, conversion to and from our jobs, errors, store
and routes. Jobs created here are ordinary jobs, submitted through api.submission.
"""
