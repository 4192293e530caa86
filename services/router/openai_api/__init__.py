"""The router's OpenAI-compatible HTTP API, a view of GenerationService.

`app` (routes, auth, access log), `generation` (one request: JSON or SSE),
`convert` (OpenAI fields <-> the gRPC contract), `schemas` (request bodies and the
fields refused), `errors` (OpenAI's envelope), `server` (uvicorn in the router's loop).
"""
