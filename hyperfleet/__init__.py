"""The basics every Hyperfleet role shares, importable without loading any role: the error
root (`errors`) and process supervision (`processes`). Nothing here imports Ray, the Anthropic
SDK, pydantic, or another Hyperfleet package."""
