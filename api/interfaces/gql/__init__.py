"""The GraphQL interface (Strawberry): schema, types, error codes and the ASGI view."""
