"""Load tests for an SGLang server (kascade or dense): Locust users, a runner, a soak.

Only ``locustfile.py`` imports locust (which monkey-patches the process with gevent on import);
the other modules are plain Python so the runner and the tests can import them.
"""
