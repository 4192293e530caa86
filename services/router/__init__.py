"""The router: the public front door (`tokenyard router serve`, port 50051).

Authenticates every call through auth (cached), authorizes the model, applies
rate limits and quotas (in-process or Redis), picks a worker by policy, relays
the token stream with failover and mid-stream resume, and reports usage to
auth. `services.router.app.RouterApp` assembles it from `RouterSettings`.
"""
