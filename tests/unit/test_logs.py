"""The console a user reads: project lines tagged, libraries' routine lines gone, warnings kept."""

import logging
import os
import sys

from pipelines import logs


def _record(name, level, pathname, msg):
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_project_lines_are_tagged_and_library_noise_is_dropped(capsys):
    root = logging.getLogger()
    foreign = logging.StreamHandler(sys.stderr)  # as Prefect installs on import
    root.addHandler(foreign)
    logs.setup()
    assert foreign not in root.handlers  # no line printed twice in two formats

    logging.getLogger("t2v.demo").info("cycle 0 done")
    root.handle(_record("root", logging.INFO, f"{os.sep}site{os.sep}open_clip{os.sep}factory.py", "Loaded config"))
    root.handle(_record("root", logging.WARNING, f"{os.sep}site{os.sep}open_clip{os.sep}factory.py", "odd weights"))
    logging.getLogger("compilers.C.base").info("gcc -c test.c")  # setuptools' distutils, as DeepSpeed builds ops
    ray_file = f"{os.sep}site{os.sep}ray{os.sep}train{os.sep}context.py"
    root.handle(_record(ray_file, logging.INFO, ray_file, "Reporting training result 1"))  # a logger named by path
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTP connection")
    logging.getLogger("urllib3.connectionpool").warning("store is slow")
    out, err = capsys.readouterr()
    assert out == "[demo] cycle 0 done\n"
    assert "[root] warning: odd weights" in err and "[connectionpool] warning: store is slow" in err
    assert "Loaded config" not in out + err and "gcc" not in out + err and "Reporting" not in out + err


def test_libraries_configuring_their_own_loggers_later_read_warning_from_the_environment(monkeypatch):
    for variable in logs.LIBRARY_LEVEL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")  # what the user set wins
    logs.setup()
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"
