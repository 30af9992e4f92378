"""The router's services: receiver, router, processor, dispatcher, cleaner, notifier; each can
run in its own process."""
