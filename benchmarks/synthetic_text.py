"""Words and image prompts of the synthetic Long-VITA-like records of `bench_plan` and
`bench_scale` (one copy; no environment set here, unlike the scripts that import it)."""

WORDS = (
    "the a image shows chart of revenue growth over time with blue bars and red line axis "
    "labels person standing near table window light sky building text document page figure "
    "left right top bottom small large several two three colors background foreground scene"
).split()
PROMPTS = [
    "Describe the image in detail.",
    "What is shown in this picture?",
    "Give a short caption for the image.",
    "What is the title of the chart?",
    "How many people are in the image?",
    "Read the text in the image.",
    "What color is the largest object?",
    "Summarize the document.",
]
"""The 8 instructions of a caption / QA set's user turns."""
