"""What the op families share: argument checks (`checks`) and numerics (`numerics`). Imports nothing else of
ramjax.ops."""
