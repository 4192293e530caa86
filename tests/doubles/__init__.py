"""Test doubles and fixtures the product never imports: an in-memory AuthService and
a scripted worker (real gRPC, for router tests and benchmarks), and a tiny random
Llama with a locally trained tokenizer."""
