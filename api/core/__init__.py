"""The core: the domain's rules and types, its errors, and the service that applies them."""
