"""The example shop: one model, three views, and a leak in a background thread."""
