"""The LLM agents: a small local language model (or an OpenAI-compatible endpoint) asked in-context every decision
window.

- :mod:`~rudder.agents.llm.agent` — :class:`LLMAgent`, keep/replace over the candidate ranking.
- :mod:`~rudder.agents.llm.link` — :class:`LLMLinkAgent`, link-budget levels.
- :mod:`~rudder.agents.llm.prompt` — prompts, few-shot examples, the answer parser.
- :mod:`~rudder.agents.llm.models` — loading the model from a local folder, a GGUF file or a model package.
- :mod:`~rudder.agents.llm.client`, :mod:`~rudder.agents.llm.server` — the OpenAI-compatible client and rudder's
  own decision service.
"""
