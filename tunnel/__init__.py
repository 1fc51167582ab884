"""aldaas tunnel package."""
