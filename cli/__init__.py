"""The `lora-server` command (alias `kkit-lora-server`): runs the service on this machine (launcher) or
talks to a running one over HTTP (client)."""
