"""mercure notifier plugin ``email``."""
