"""MLflow models-from-code entry: the file `mlflow.pyfunc.log_model` records as the model."""

from mlflow.models import set_model

from pix2seq.serving import Pix2SeqPyfunc

set_model(Pix2SeqPyfunc())
