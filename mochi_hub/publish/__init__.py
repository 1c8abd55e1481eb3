"""Publishing: what a SOURCE is, the timm export, other formats, the model card, charts, the Hub push, and a local
Hub endpoint to try it offline."""
