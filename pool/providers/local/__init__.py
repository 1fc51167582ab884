"""The local provider: PostgreSQL processes over data folders on this machine."""
