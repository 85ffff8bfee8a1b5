"""Chat: gpt2lab's chat format and everything that speaks it.

- `chat.template`: the format (`ChatTemplate`: messages to ids and the loss mask, the stop
  tokens, the prompt of an answer) and the one refusal of a base model (`chat_template_for`);
- `chat.records`: reading training conversations (OpenAI-style messages, Alpaca records, hub
  datasets) for `prepare chat`;
- `chat.session`: answering conversations with a model (`Chat`, `load_chat`).
Training data (`data.chat_prepare`, `data.chat_loader`), scoring (`eval.chat`), the terminal
(`cli.chat`) and the server (`serve`) build on these.
"""
