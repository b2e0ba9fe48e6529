"""Process titles, so that ps and top tell the master, workers and registrar apart."""
import setproctitle


def set(role):
    setproctitle.setproctitle(f'zkprefork: {role}')
