import os
import re

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(here, name), encoding='utf-8') as file:
        return file.read()


setup(
    name='zkprefork',
    version=re.search(r"__version__ = '([^']+)'", read('zkprefork/__init__.py')).group(1),
    description='Prefork WSGI server on zope.server that registers in ZooKeeper',
    long_description=read('README.rst') + '\n\n' + read('CHANGES.rst'),
    long_description_content_type='text/x-rst',
    license='ZPL-2.1',
    packages=find_packages(include=['zkprefork', 'zkprefork.*']),
    python_requires='>=3.11',
    install_requires=[
        # zkprefork/zopeserver.py subclasses and patches zope.server's internals:
        # only the releases the tests cover.
        'zope.server >= 5.0, < 5.1',
        'pyasyncore; python_version >= "3.12"',
        'kazoo >= 2.9',
        'PasteDeploy >= 3.0',
        'ZConfig >= 3.6',
        'setproctitle',
        'psutil',
        'httptools >= 0.9',
        'prometheus_client',
    ],
    extras_require={
        'test': ['pytest', 'pytest-timeout', 'pytest-xdist', 'pyramid', 'zc.zservertracelog', 'pure-sasl', 'cryptography',
                 'docutils'],
        # bench/: the peer servers, the reload plot and the profiler; the real
        # applications (bench/realapps.py) and the TLS table's test certificates
        # (wrk, gcc and ZooKeeper come from Debian: apt-get install -y wrk gcc zookeeper).
        'bench': ['gunicorn', 'waitress', 'pyuwsgi', 'granian', 'matplotlib', 'py-spy',
                  'flask >= 3.1', 'jinja2 >= 3.1', 'django >= 5.2', 'trustme'],
        'sasl': ['pure-sasl'],
        'tracelog': ['zc.zservertracelog'],
    },
    entry_points={
        'console_scripts': ['zkprefork = zkprefork.cli:main',
                            'zkprefork-providers = zkprefork.discovery.command:main'],
        'paste.server_runner': ['main = zkprefork.runner:run'],
        'paste.app_factory': ['demo = zkprefork.demo:make_app'],
    },
    classifiers=[
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Internet :: WWW/HTTP :: WSGI :: Server',
    ],
)
