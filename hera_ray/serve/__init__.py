"""Ray Serve adapters: the HTTP ingress (OpenAI-compatible + agent runs) and the app builder."""
