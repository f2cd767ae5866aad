"""The basics every Hyperfleet role shares, importable without loading any role: the error
root (`errors`), process supervision (`processes`), files only their owner reads (`private`), the
names of the Ray actors the roles find each other by (`names`), and what the API and the replicas
exchange about a turn's tokens, its reservation and its metered usage (`metering`). Nothing here
imports Ray, the Anthropic SDK, pydantic, or another Hyperfleet package."""
