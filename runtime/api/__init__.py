"""kiln's HTTP APIs, each encoding requests and responses for the generation core (runtime/service.py): OpenAI
(``openai``), LMI and TGI (``lmi``), and their request schemas (``protocol``)."""
