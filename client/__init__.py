"""aldaas client package."""
