"""The index.json contract: the pydantic model, reading and checking, the schema, canonical form."""
