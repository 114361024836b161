"""Push providers (bridge/push/provider.py: ``PushProvider``): one module per platform."""
