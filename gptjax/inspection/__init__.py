"""Looking inside a model: its attention weights as heatmaps (`attention`) and its
gradients checked against finite differences (`gradcheck`). Behind `gptjax inspect`."""
