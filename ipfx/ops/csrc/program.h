// A whole graph as one native call (ipfx/ops/program.py builds it; included into ip_conv.cpp, whose BoundConv
// it calls). A graph of fused convs and aten ops run from Python costs the interpreter between every two kernels
// (a third of a batch-1 mobilenet_v3_large); here the same steps, with the same kernels and arguments, run from
// one loop:
//
//   conv    a BoundConv on a slot (and a residual slot), its activation code; or a pointwise BoundConv and the
//           grouped one that alone reads its output, as one pointwise_grouped call (add_fused); or a BoundConv
//           on slots in the batch-blocked layout (blocked.h's bound_blocked)
//   op      an aten operator called boxed: its arguments converted once by the operator's schema, the slots'
//           values put in place on each call
//   python  any other node: a Python callable given the slots' values
//
// Each slot is freed after its last use (as the generated forward's `x = None`). Before the first step every
// guard is checked: the Python attributes the steps were built from (a module's buffers, parameters, settings
// and its place in the module tree, each `dict[key] is value` or absent; its class; its hooks, none) and the
// in-place versions of the tensors a conv was bound to. Where one has changed, run returns None and runs
// nothing: Python builds a new program from the module as it is now.

namespace {

namespace py = pybind11;

// A Python constant as an argument of schema type `type`: None, bool, int, float, str, a list of ints, floats or
// bools, a tensor. Anything else raises (the builder then makes the node a Python step).
c10::IValue constant_ivalue(py::handle obj, const c10::TypePtr& type) {
  c10::TypePtr t = type;
  if (obj.is_none()) return c10::IValue();
  if (auto optional = t->cast<c10::OptionalType>()) t = optional->getElementType();
  switch (t->kind()) {
    case c10::TypeKind::TensorType:
      return py::cast<at::Tensor>(obj);
    case c10::TypeKind::BoolType:
      if (PyBool_Check(obj.ptr())) return py::cast<bool>(obj);
      break;
    case c10::TypeKind::IntType:
      if (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) return py::cast<int64_t>(obj);
      break;
    case c10::TypeKind::FloatType:
      if (PyFloat_Check(obj.ptr()) || (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())))
        return py::cast<double>(obj);
      break;
    case c10::TypeKind::NumberType:
      if (PyBool_Check(obj.ptr())) return py::cast<bool>(obj);
      if (PyLong_Check(obj.ptr())) return py::cast<int64_t>(obj);
      if (PyFloat_Check(obj.ptr())) return py::cast<double>(obj);
      break;
    case c10::TypeKind::StringType:
      if (PyUnicode_Check(obj.ptr())) return py::cast<std::string>(obj);
      break;
    case c10::TypeKind::ListType: {
      if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr())) break;
      auto element = t->castRaw<c10::ListType>()->getElementType()->kind();
      if (element == c10::TypeKind::IntType || element == c10::TypeKind::SymIntType)
        return c10::IValue(c10::List<int64_t>(py::cast<std::vector<int64_t>>(obj)));
      if (element == c10::TypeKind::FloatType) return c10::IValue(c10::List<double>(py::cast<std::vector<double>>(obj)));
      if (element == c10::TypeKind::BoolType) {
        c10::List<bool> bools;
        for (auto item : obj) {
          if (!PyBool_Check(item.ptr())) throw py::type_error("ipfx native program: a list of bools holds a non-bool");
          bools.push_back(item.ptr() == Py_True);
        }
        return c10::IValue(std::move(bools));
      }
      break;
    }
    case c10::TypeKind::SymIntType:
      if (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) return py::cast<int64_t>(obj);
      break;
    default:
      break;
  }
  throw py::type_error("ipfx native program: no constant of type " + type->str() + " from a " +
                       std::string(py::str(py::type::of(obj).attr("__name__"))));
}

struct ProgramStep {
  enum Kind { kConv, kOp, kPython } kind;
  int64_t output = -1;                  // slot written (-1: the value is dropped)
  std::vector<int64_t> release;         // slots whose last use is this step
  // conv
  std::shared_ptr<BoundConv> conv;
  int64_t x = -1, residual = -1, activation = 0;
  std::shared_ptr<BoundConv> producer;  // (fused: the pointwise conv whose output `conv` reads; x is its input)
  int64_t producer_activation = 0;
  bool blocked = false;                 // x, the residual and the output in the batch-blocked layout (blocked.h)
  // op
  c10::optional<c10::OperatorHandle> op;
  std::vector<c10::IValue> stack;       // every argument (None at the slots' positions)
  std::vector<std::pair<size_t, int64_t>> places;  // (stack position, slot)
  // python
  py::object fn;
  std::vector<int64_t> inputs;
};

class Program {
 public:
  Program(int64_t slots, int64_t inputs) : slots_(slots), inputs_(inputs) {
    TORCH_CHECK(slots >= inputs && inputs >= 0, "ipfx native program: bad slot counts");
  }

  // dict[key] must be `value` (by identity), or, where `missing`, key must not be in dict.
  void guard_item(py::dict dict, py::object key, py::object value, bool missing) {
    items_.push_back({std::move(dict), std::move(key), std::move(value), missing});
  }
  void guard_type(py::object obj, py::object type) { types_.push_back({std::move(obj), std::move(type)}); }
  void guard_empty(py::dict dict) { empties_.push_back(std::move(dict)); }
  // t's in-place version and data (storage.py's tensor_state: `t.data = other` counts no version; the storage is
  // held, so that no later allocation takes its address while the program lives)
  void guard_version(const at::Tensor& t) {
    versions_.push_back({t, t._version(), address(t), t.has_storage() ? t.storage() : c10::Storage()});
  }

  void add_conv(std::shared_ptr<BoundConv> conv, int64_t x, int64_t residual, int64_t activation, int64_t output,
                bool blocked = false) {
    TORCH_CHECK(!blocked || runs_blocked(*conv), "ipfx native program: a conv that does not run blocked");
    ProgramStep s{ProgramStep::kConv};
    s.blocked = blocked;
    s.conv = std::move(conv), s.x = check_slot(x), s.residual = residual < 0 ? -1 : check_slot(residual);
    s.activation = activation, s.output = check_output(output);
    steps_.push_back(std::move(s));
  }

  // The pointwise conv `producer` on slot x, then `conv` on its output, as one call (pointwise_grouped): for a
  // pair pointwise_feeds_grouped accepts, where nothing else reads the pointwise conv's output.
  void add_fused(std::shared_ptr<BoundConv> producer, int64_t producer_activation, std::shared_ptr<BoundConv> conv,
                 int64_t x, int64_t residual, int64_t activation, int64_t output) {
    TORCH_CHECK(pointwise_feeds_grouped(*producer, *conv), "ipfx native program: not a pair pointwise_grouped runs");
    add_conv(std::move(conv), x, residual, activation, output);
    steps_.back().producer = std::move(producer);
    steps_.back().producer_activation = producer_activation;
  }

  // `values`: one per schema argument, in order (None where a slot goes); `places`: (argument, slot).
  void add_op(const std::string& name, const std::string& overload, py::list values,
              std::vector<std::pair<int64_t, int64_t>> places, int64_t output) {
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& schema = handle.schema();
    const auto& arguments = schema.arguments();
    TORCH_CHECK(values.size() == arguments.size() && schema.returns().size() == 1 &&
                    schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                "ipfx native program: ", name, ".", overload, " needs ", arguments.size(),
                " arguments and returns one tensor");
    ProgramStep s{ProgramStep::kOp};
    s.op = handle;
    for (size_t i = 0; i < arguments.size(); ++i)
      s.stack.push_back(constant_ivalue(values[i], arguments[i].real_type()));
    for (const auto& [arg, slot] : places) {
      TORCH_CHECK(arg >= 0 && arg < (int64_t)arguments.size(), "ipfx native program: bad argument position");
      s.places.emplace_back((size_t)arg, check_slot(slot));
    }
    s.output = check_output(output);
    steps_.push_back(std::move(s));
  }

  void add_python(py::object fn, std::vector<int64_t> inputs, int64_t output) {
    ProgramStep s{ProgramStep::kPython};
    s.fn = std::move(fn), s.output = check_output(output);
    for (int64_t i : inputs) s.inputs.push_back(check_slot(i));
    steps_.push_back(std::move(s));
  }

  void set_outputs(std::vector<int64_t> outputs) {
    for (int64_t o : outputs) check_slot(o);
    outputs_ = std::move(outputs);
    release_after_last_use();
  }

  // Whether every guard holds (nothing is run).
  bool current() const {
    for (const auto& g : items_) {
      PyObject* got = PyDict_GetItemWithError(g.dict.ptr(), g.key.ptr());
      if (got == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (g.missing ? got != nullptr : got != g.value.ptr()) return false;
    }
    for (const auto& d : empties_)
      if (PyDict_Size(d.ptr()) != 0) return false;
    for (const auto& [obj, type] : types_)
      if ((PyObject*)Py_TYPE(obj.ptr()) != type.ptr()) return false;
    for (const auto& g : versions_)
      if (g.t._version() != g.version || address(g.t) != g.address) return false;
    return true;
  }

  // The outputs (a list), or None where a guard has failed (then nothing ran).
  py::object run(const std::vector<at::Tensor>& inputs) const {
    TORCH_CHECK((int64_t)inputs.size() == inputs_, "ipfx native program: takes ", inputs_, " inputs, got ",
                inputs.size());
    if (!current()) return py::none();
    std::vector<Slot> slot(slots_);
    for (int64_t i = 0; i < inputs_; ++i) slot[i].tensor = inputs[i];
    const bool timing = timing_;
    for (size_t k = 0; k < steps_.size(); ++k) {
      const auto& s = steps_[k];
      const auto started = timing ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
      Slot out;
      switch (s.kind) {
        case ProgramStep::kConv: {
          c10::optional<at::Tensor> residual;
          if (s.residual >= 0) residual = slot[s.residual].tensor.contiguous();
          if (s.blocked)
            out.tensor = bound_blocked(*s.conv, slot[s.x].tensor.contiguous(), residual, s.activation);
          else if (s.producer)
            out.tensor = pointwise_grouped(*s.producer, s.producer_activation, *s.conv, slot[s.x].tensor.contiguous(),
                                           residual, s.activation);
          else
            out.tensor = (*s.conv)(slot[s.x].tensor.contiguous(), residual, s.activation);
          break;
        }
        case ProgramStep::kOp: {
          std::vector<c10::IValue> stack(s.stack);
          for (const auto& [arg, i] : s.places) stack[arg] = slot[i].tensor;
          s.op->callBoxed(stack);
          out.tensor = std::move(stack.at(0)).toTensor();
          break;
        }
        case ProgramStep::kPython: {
          py::tuple args(s.inputs.size());
          for (size_t i = 0; i < s.inputs.size(); ++i) args[i] = slot[s.inputs[i]].object();
          py::object value = s.fn(*args);
          if (THPVariable_Check(value.ptr()))
            out.tensor = THPVariable_Unpack(value.ptr());
          else
            out.value = std::move(value);
          break;
        }
      }
      for (int64_t r : s.release) slot[r] = Slot();
      if (s.output >= 0) slot[s.output] = std::move(out);
      if (timing)
        spent_[k] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started)
                         .count();
    }
    py::list result(outputs_.size());
    for (size_t i = 0; i < outputs_.size(); ++i) result[i] = slot[outputs_[i]].object();
    return std::move(result);
  }

  // Per-step wall time, for profiling (benchmarks/program_profile.py): while timing is on, each run adds each
  // step's time (its kernel, and freeing the values it read last) to its total; `step_seconds` reads the totals,
  // which turning timing on sets to zero and turning it off keeps. Off by default (then a run costs one test per
  // step). Concurrent runs add to the same totals (atomically).
  void set_timing(bool on) {
    if (on) {
      if (spent_.size() != steps_.size()) spent_ = std::vector<std::atomic<int64_t>>(steps_.size());
      for (auto& t : spent_) t = 0;
    }
    timing_ = on;
  }
  std::vector<double> step_seconds() const {
    std::vector<double> out;
    for (const auto& t : spent_) out.push_back(t.load() * 1e-9);
    return out;
  }

  std::vector<std::string> kinds() const {  // each step's kind, in order ("fused": add_fused's; "blocked")
    static const char* names[] = {"conv", "op", "python"};
    std::vector<std::string> out;
    for (const auto& s : steps_) out.push_back(s.producer ? "fused" : s.blocked ? "blocked" : names[s.kind]);
    return out;
  }

 private:
  // A step's value: a tensor (what convs and ops read and write), or any Python value a Python step returned.
  struct Slot {
    at::Tensor tensor;
    py::object value;
    py::object object() const { return tensor.defined() ? py::cast(tensor) : value ? value : py::none(); }
  };

  struct Item {
    py::dict dict;
    py::object key, value;
    bool missing;
  };

  int64_t check_slot(int64_t i) const {
    TORCH_CHECK(i >= 0 && i < slots_, "ipfx native program: slot ", i, " out of range");
    return i;
  }
  int64_t check_output(int64_t i) const { return i < 0 ? -1 : check_slot(i); }

  // Each slot read is freed after the last step that reads it, unless a later step writes it again or it is an
  // output (a slot a step writes is never an input's: the builder numbers them apart).
  void release_after_last_use() {
    std::vector<int64_t> last(slots_, -1);
    for (size_t k = 0; k < steps_.size(); ++k) {
      const auto& s = steps_[k];
      auto read = [&](int64_t i) { if (i >= 0) last[i] = (int64_t)k; };
      read(s.x), read(s.residual);
      for (const auto& p : s.places) read(p.second);
      for (int64_t i : s.inputs) read(i);
    }
    for (int64_t o : outputs_) last[o] = -1;
    for (auto& s : steps_) s.release.clear();
    for (int64_t i = 0; i < slots_; ++i)
      if (last[i] >= 0) steps_[last[i]].release.push_back(i);
  }

  int64_t slots_, inputs_;
  std::vector<Item> items_;
  std::vector<std::pair<py::object, py::object>> types_;
  std::vector<py::dict> empties_;
  struct VersionGuard {
    at::Tensor t;
    int64_t version;
    const void* address;
    c10::Storage held;
  };
  std::vector<VersionGuard> versions_;
  static const void* address(const at::Tensor& t) {
    return t.unsafeGetTensorImpl()->has_storage() ? t.const_data_ptr() : nullptr;
  }
  std::vector<ProgramStep> steps_;
  std::vector<int64_t> outputs_;
  bool timing_ = false;
  mutable std::vector<std::atomic<int64_t>> spent_;
};

void bind_program(py::module_& m) {
  py::class_<Program>(m, "Program", py::dynamic_attr())
      .def(py::init<int64_t, int64_t>(), py::arg("slots"), py::arg("inputs"))
      .def("guard_item", &Program::guard_item, py::arg("dict"), py::arg("key"), py::arg("value"),
           py::arg("missing"))
      .def("guard_type", &Program::guard_type)
      .def("guard_empty", &Program::guard_empty)
      .def("guard_version", &Program::guard_version)
      .def("add_conv", &Program::add_conv, py::arg("conv"), py::arg("x"), py::arg("residual"), py::arg("activation"),
           py::arg("output"), py::arg("blocked") = false)
      .def("add_fused", &Program::add_fused)
      .def("add_op", &Program::add_op)
      .def("add_python", &Program::add_python)
      .def("set_outputs", &Program::set_outputs)
      .def("current", &Program::current)
      .def("run", &Program::run)
      .def("set_timing", &Program::set_timing)
      .def_property_readonly("step_seconds", &Program::step_seconds)
      .def_property_readonly("kinds", &Program::kinds);
}

}  // namespace
