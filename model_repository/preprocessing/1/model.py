"""Triton shell over pipeline.preprocess (the logic lives and is tested there)."""

from launcher.startup_heap import freeze_startup_heap
from pipeline.preprocess import Preprocessor
from pipeline.tensors import InvalidRequest
from pipeline.triton_io import ModelShell, error_response, response
from tokenization.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.shell = ModelShell(args)
        tokenizer = Tokenizer.from_dir(self.shell.parameters["tokenizer_dir"])
        self.preprocess = Preprocessor(tokenizer, max_seq_len=int(self.shell.parameters["max_seq_len"]))
        freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(response(self.preprocess(self.shell.inputs(request), request.request_id())))
            except InvalidRequest as exc:
                responses.append(error_response(str(exc)))
        return responses
