"""Plain functions that explain a model's outputs (predictions per level, saliency maps,
faithfulness scores, OOD scores, neighbourhoods, text explanations). Each takes a model and
tensors or arrays and returns arrays or small records; the pages only lay the results out."""
