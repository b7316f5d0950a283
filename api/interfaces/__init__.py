"""What clients speak: GraphQL, REST v1 and MCP, each a thin layer over the service."""
