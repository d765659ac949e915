"""`lvita show`: one packed sequence as the model sees it, for when the loss looks wrong.

Modules: `model` (pure: a pack cut into documents and segments, token counts per part), `read`
(the I/O: a build opened with the training loader, one pack by index or key, its tokenizer and
tiles), `text` (terminal rendering, ANSI colours optional), `html` (a self-contained page with
the tiles drawn at their placeholder positions).
"""
