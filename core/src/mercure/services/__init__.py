"""The router's services: receiver, router, dispatcher, cleaner. Each can run in its own process."""
