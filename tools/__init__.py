"""Developer tools (throttled test origin, netns link helper); run each as ``python tools/<name>.py --help``."""
