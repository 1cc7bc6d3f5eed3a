"""Model assembly: blocks, the GPT layer list, pipeline specs."""
