"""Publishing: what a SOURCE is, the timm export, other formats, the model card, charts, and the Hub push."""
