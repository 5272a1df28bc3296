"""A small Django project served by real ASGI servers in tests/integration/test_django.py."""
