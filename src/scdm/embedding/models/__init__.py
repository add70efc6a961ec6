"""One module per model family; each registers its adapter with ``@register_adapter``."""
