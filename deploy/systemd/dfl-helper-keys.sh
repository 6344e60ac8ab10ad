#!/bin/sh
# /opt/dfl/bin/dfl-helper-keys, run by dfl-helper-keys.service on the helper's host before
# dfl-helper.service: the helper's broker user and keys, made by `dfl admin add-helper`
# through RabbitMQ's management API, in $STATE_DIRECTORY (/var/lib/dfl/helper-keys):
# - helper.key/helper.pub (its answers are signed with helper.key: give helper.pub to the
#   aggregator's --keys directory, /var/lib/dfl/keys on the aggregator's host);
# - helper-seal.key/helper-seal.pem (the parties seal their seeds to helper-seal.pem: give it
#   to every party, /etc/dfl/keys/helper-seal.pem);
# - the broker user dfl-<federation>-helper, whose broker URL (DFL_BROKER's host with this
#   user and password) goes to helper.env for the helper.
# The identity is made once; later runs only rewrite helper.env. This folder is also the
# helper's --party-keys: its own copies of aggregator.pub and the parties' <id>.pub go here.
#
# Environment: DFL_BROKER (scheme, host, port and vhost; any user:password in it is
# replaced), DFL_FEDERATION from /etc/dfl/dfl.env; RABBITMQ_MANAGEMENT_URL and
# DFL_ADMIN_PASSWORD from /etc/dfl/admin.env.
set -eu
keys=${STATE_DIRECTORY:-/var/lib/dfl/helper-keys}
federation=${DFL_FEDERATION:-mnist}
management=${RABBITMQ_MANAGEMENT_URL:?set RABBITMQ_MANAGEMENT_URL in /etc/dfl/admin.env}
broker=${DFL_BROKER:?set DFL_BROKER in /etc/dfl/dfl.env}
umask 077
cd "$keys"

user="dfl-$federation-helper"
if [ ! -f helper.key ]; then
    rm -f "$user.password" helper.pub helper-seal.key helper-seal.pem
    dfl admin add-helper --federation "$federation" --keys "$keys" --management-url "$management"
fi
password=$(cat "$keys/$user.password")
urls=""
IFS=,  # each node's URL, for the several nodes of a cluster separated by commas
for url in $broker; do
    rest=${url#*://}
    urls="${urls:+$urls,}${url%%://*}://$user:$password@${rest#*@}"
done
printf 'DFL_BROKER=%s\n' "$urls" >helper.env.new
mv helper.env.new helper.env
