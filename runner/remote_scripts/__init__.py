"""Scripts the controller sends to remote hosts and runs there with the host's python3."""
