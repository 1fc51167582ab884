"""aldaas broker package."""
